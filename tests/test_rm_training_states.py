"""Reward-model training states at their size: only trainable weights saved (frozen ones rebuilt, checked by
fingerprint), a free-space check before writing, the log file and progress bar, export from any saved state."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from rm_training_synthetic import tiny_config_dict, write_task  # noqa: E402

import ImageReward as RM  # noqa: E402
from ImageReward.cli import main  # noqa: E402
from ImageReward.errors import CheckpointError, DiskSpaceError  # noqa: E402
from ImageReward import disk as disk_module  # noqa: E402 (free-space checks of both trainers)
from ImageReward.rm_training.config import config_from_dict  # noqa: E402
from ImageReward.rm_training.data import read_groups  # noqa: E402
from ImageReward.rm_training.export import export_model, group_rewards  # noqa: E402
from ImageReward.rm_training.model import trainable_parameter_names  # noqa: E402
from ImageReward.rm_training.states import TRAINABLE_NAME, frozen_fingerprint, load_trainable  # noqa: E402
from ImageReward.rm_training.trainer import _initial_model, train_reward_model  # noqa: E402

# 100 pairs: 13 micro-batches of 8 per epoch, 7 optimizer steps with accumulation 2
OPTIONS = dict(epochs=2, batch_size=8, accumulation_steps=2, lr=5e-4, valid_per_epoch=2, seed=3,
               checkpointing_steps=1, fix_rate=0.5, log_every=2)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("states_task")
    write_task(root, train=20, valid=6, test=6)
    return root


def _data(task: Path, out: Path, **train) -> dict:
    data = tiny_config_dict(task, **{**OPTIONS, **train})
    for key, name in (("checkpoint_base", "checkpoint"), ("visual_base", "visualization"), ("log_base", "log")):
        data[key] = str(out / name)
    return data


def _full_model(cfg, folder: Path):
    _, model = _initial_model(cfg, None)
    load_trainable(model, folder, frozen_fingerprint(model))
    return model


@pytest.fixture(scope="module")
def stopped(task, tmp_path_factory):
    """A run stopped by max_steps=3, checkpointing every step (no export: it did not finish)."""
    out = tmp_path_factory.mktemp("stopped")
    cfg = config_from_dict(_data(task, out, max_steps=3))
    return cfg, train_reward_model(cfg)


def test_states_hold_only_the_trainable_weights(stopped):
    cfg, result = stopped
    assert not result.finished and result.export_dir is None and result.global_step == 3
    states = sorted(p.name for p in (result.run_dir / "states").iterdir())
    assert states == ["checkpoint-2", "checkpoint-3"]               # checkpoints_total_limit 2, no .tmp left
    state = result.run_dir / "states" / "checkpoint-3"
    assert not (state / "model.safetensors").exists()
    _, model = _initial_model(cfg, None)
    names = trainable_parameter_names(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert names and any(n.startswith("blip.text_encoder.encoder.layer.0.") for n in frozen)  # fix_rate 0.5
    from safetensors import safe_open

    for folder in (state, result.run_dir / "best"):
        with safe_open(str(folder / TRAINABLE_NAME), framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(names)
            assert handle.metadata()["frozen_sha256"] == frozen_fingerprint(model)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert (state / TRAINABLE_NAME).stat().st_size == pytest.approx(trainable, rel=0.05, abs=20_000)
    # the optimizer holds Adam's two moments of the trainable parameters only
    optimizer = torch.load(state / "optimizer.bin", map_location="cpu", weights_only=True)
    assert sum(v["exp_avg"].numel() for v in optimizer["state"].values()) == trainable // 4
    assert json.loads((result.run_dir / "best" / "best.json").read_text())["step"] in (0, 3)


def test_resume_on_other_frozen_weights_is_refused(task, stopped, tmp_path):
    import shutil

    from ImageReward.errors import ResumeSettingsError

    cfg, result = stopped
    data = _data(task, Path(cfg.checkpoint_base).parent, max_steps=4, seed=4,  # seed 4: other random frozen layers
                 resume_from_checkpoint=str(result.run_dir / "states" / "checkpoint-3"))
    with pytest.raises(ResumeSettingsError, match=r"checkpoint-3: config key 'train.seed' 3 -> 4"):
        train_reward_model(config_from_dict(data))  # the settings check comes first, before any model loads
    # a state whose settings cannot be compared (written by an older version): the frozen-weight fingerprint
    old_state = shutil.copytree(result.run_dir / "states" / "checkpoint-3", tmp_path / "old" / "checkpoint-3")
    (old_state / "train_config.json").unlink()
    data["train"]["resume_from_checkpoint"] = str(old_state)
    with pytest.raises(CheckpointError, match=r"checkpoint-3.*trainable.safetensors.*other frozen weights"):
        train_reward_model(config_from_dict(data))
    other = config_from_dict({**_data(task, tmp_path), "train": {**_data(task, tmp_path)["train"], "fix_rate": 0.0}})
    _, model = _initial_model(other, None)
    with pytest.raises(CheckpointError, match=r"does not fit the model's trainable parameters.*missing"):
        load_trainable(model, result.run_dir / "best", frozen_fingerprint(model))


def test_export_from_best_and_from_a_state(task, stopped, tmp_path, capsys):
    import yaml

    cfg, result = stopped
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_data(task, Path(cfg.checkpoint_base).parent, max_steps=3)))
    best = result.run_dir / "best"
    assert main(["train-rm", "--config", str(config), "--export-from", str(best)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = result.run_dir / "ImageReward"
    assert summary["export"] == str(folder) and summary["export_pt"] is None
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = RM.load(str(folder), device="cpu")  # strict
    expected = _full_model(cfg, best).eval()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # mean/std from the validation set: its rewards come out N(0, 1)
    rewards = torch.tensor(sum(group_rewards(loaded, read_groups(task / "dataset" / "valid.json"),
                                             task / "images"), []))
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (summary["mean"], summary["std"]) == pytest.approx((loaded.mean, loaded.std))
    assert not math.isnan(summary["test_accuracy"])

    # a state, into another folder, both formats
    state = result.run_dir / "states" / "checkpoint-3"
    assert main(["train-rm", "--config", str(config), "--export-from", str(state), "--export-dir", str(tmp_path / "x"),
                 "--set", "train.export_format=both"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 3 and summary["finished"] is False
    assert summary["export"] == str(tmp_path / "x" / "ImageReward-step3")
    from_pt = torch.load(tmp_path / "x" / "ImageReward-step3.pt", map_location="cpu", weights_only=True)
    expected = _full_model(cfg, state).state_dict()
    assert all(torch.equal(from_pt[k], v) for k, v in expected.items() if k in from_pt)
    strict = RM.ImageReward(_initial_model(cfg, None)[0])
    strict.load_checkpoint_state(from_pt)  # strict (RM.load of a .pt assumes the released model's size)
    assert (strict.mean, strict.std) == pytest.approx((summary["mean"], summary["std"]))

    # not a saved state: one typed line, exit status 2
    assert main(["train-rm", "--config", str(config), "--export-from", str(tmp_path)]) == 2
    assert re.search(r"error: --export-from .*expected a state folder", capsys.readouterr().err)


def test_no_free_space_fails_before_writing_a_state(task, tmp_path, monkeypatch):
    real = disk_module.shutil.disk_usage
    monkeypatch.setattr(disk_module.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=10 << 20))  # 10 MB free
    cfg = config_from_dict(_data(task, tmp_path, max_steps=1, validate_at_start=False, valid_per_epoch=1))
    with pytest.raises(DiskSpaceError, match=r"training state checkpoint-1 .*needs about .* free"):
        train_reward_model(cfg)
    run = Path(cfg.checkpoint_base) / cfg.run_name()
    assert not (run / "states").exists() or not any((run / "states").iterdir())  # nothing half-written
    with pytest.raises(DiskSpaceError, match="the export ImageReward"):
        export_model(RM.ImageReward(_initial_model(cfg, None)[0]), tmp_path / "export", mean=0.0, std=1.0)
    assert not (tmp_path / "export" / "ImageReward").exists()


def test_log_file_and_progress_bar_by_default(task, tmp_path, capfd):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_data(task, tmp_path, max_steps=4, std_log=True, checkpointing_steps=100)))
    assert main(["train-rm", "--config", str(config)]) == 0  # no -v
    err = capfd.readouterr().err
    # tqdm's bar: steps done, rate and the postfix with loss, accuracy and lr
    assert re.search(r"train: 100%.*4/4 \[.*(step/s|s/step).*loss=\d\.\d{4}.*lr=", err), err[-2000:]
    log = next((tmp_path / "log").glob("*.txt")).read_text()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ImageReward\.rm_training\.trainer: "
    assert re.search(stamp + r"step 2/14 epoch 0: train loss \d\.\d{4} accuracy [\d.]+ \(32 pairs\) lr ", log), log
    assert re.search(stamp + r"step 4/14 epoch 0: train loss", log)
    assert re.search(stamp + r"step 0: validation loss", log)
    assert "stopping at max_steps=4" in log


def test_std_log_writes_info_to_the_file_only(task, tmp_path):
    """Library use with the console at WARNING: the log file still gets the INFO lines, the console does not."""
    import io
    import logging

    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        cfg = config_from_dict(_data(task, tmp_path, max_steps=2, std_log=True, checkpointing_steps=100))
        train_reward_model(cfg)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    log = (tmp_path / "log" / f"{cfg.run_name()}.txt").read_text()
    assert "step 0: validation loss" in log and "step 2/14 epoch 0: train loss" in log
    assert "validation loss" not in console.getvalue() and "train loss" not in console.getvalue()
    assert "no blip_path/preload_path" in console.getvalue()             # warnings still reach the console
    assert logging.getLogger("ImageReward").level == logging.NOTSET       # restored
    assert not [h for h in logging.getLogger("ImageReward").handlers if isinstance(h, logging.FileHandler)]


def test_a_state_holding_the_full_model_still_resumes(task, stopped, tmp_path):
    """States of the earlier layout (accelerate's model.safetensors, whole model) resume to the same weights."""
    import shutil

    from safetensors.torch import save_file

    from ImageReward.rm_training.model import PairRewardModel

    cfg, result = stopped
    state = result.run_dir / "states" / "checkpoint-3"
    old = tmp_path / "old-layout"
    shutil.copytree(state, old)
    full = PairRewardModel(_full_model(cfg, state)).state_dict()
    save_file({k: v.contiguous() for k, v in full.items()}, str(old / "model.safetensors"))
    (old / TRAINABLE_NAME).unlink()
    weights = []
    for source, out in ((state, tmp_path / "a"), (old, tmp_path / "b")):
        resumed = config_from_dict(_data(task, out, max_steps=4, resume_from_checkpoint=str(source)))
        run = train_reward_model(resumed).run_dir
        weights.append(_full_model(resumed, run / "states" / "checkpoint-4").state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
