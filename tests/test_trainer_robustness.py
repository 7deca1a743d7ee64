"""Robustness of the trainers (issue 28, kinds 2-5 and 15), for ReFL (``finetune/``) and reward-model training
(``rm_training/``), on tiny pipelines (``refl_tiny.py``) and the synthetic preference task:

- seeds: the same seed gives bitwise the same weights whatever the global RNG held before (LoRA init, full
  fine-tune with EMA, the pre-training branch, SDXL / SD3 / FLUX, the reward-model trainer);
- resume with changed settings: refused naming the setting (accumulation, batch, lr, seed, reward, base model,
  LoRA rank, prompts; RM config keys, data), or accepted with a warning and a kept history;
- a disk that fills up while a trainer writes (simulated by sending a real writer to ``/dev/full``): one
  ``DiskSpaceError``, nothing earlier lost, resume works;
- missing or unreachable base models: one line, exit 2, every missing file named, before any model loads;
- ``--help`` only prints; ``--dry_run`` checks without training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from refl_tiny import _one_thread, save_tiny, save_tiny_reward, tiny_reward  # noqa: E402,F401 (autouse fixture)
from rm_training_synthetic import tiny_config_dict, write_task  # noqa: E402

from ImageReward.cli import main as imagereward_main  # noqa: E402
from ImageReward.errors import DiskSpaceError, ResumeSettingsError  # noqa: E402
from ImageReward.finetune import ReFLConfig, ReFLConfigError, ReFLTrainer  # noqa: E402
from ImageReward.finetune.cli import main as refl_main  # noqa: E402
from ImageReward.rm_training.config import RMTrainConfig, config_from_dict  # noqa: E402
from ImageReward.rm_training.trainer import train_reward_model  # noqa: E402
from ImageReward.run_settings import REFUSE, resume_policies  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [f"a photo of thing number {i}" for i in range(8)]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny sd1 pipeline, prompts, a saved tiny reward, and two pre-training images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("trainers")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([{"text": p} for p in PROMPTS]))
    for i in range(2):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(root / f"img{i}.png")
    (root / "pairs.json").write_text(json.dumps([{"image": f"img{i}.png", "text": PROMPTS[i]} for i in range(2)]))
    return {"sd1": save_tiny("sd1", root / "sd1"), "prompts": prompts, "root": root,
            "reward": save_tiny_reward(root / "reward")}


def refl_config(dirs: dict[str, Path], out: Path, **overrides) -> ReFLConfig:
    """A one-update run on 32 px images with 4 rollout steps."""
    values = dict(pretrained_model_name_or_path=str(dirs["sd1"]), train_data=str(dirs["prompts"]),
                  output_dir=str(out), resolution=32, train_batch_size=2, gradient_accumulation_steps=1,
                  max_train_steps=1, num_inference_steps=4, stop_step_min=2, stop_step_max=3, grad_scale=1.0,
                  learning_rate=5e-3, checkpointing_steps=1000, validation_steps=1000, seed=0, report_to="none",
                  reward=str(dirs["reward"]))
    values.update(overrides)
    return ReFLConfig(**values)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _trained_weights(trainer: ReFLTrainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# ---------------------------------------------------------------------------------------------- 2. seeds
REFL_SEED_CASES = {
    "sd1-lora": dict(lora_rank=4),
    "sd1-full-ema": dict(use_ema=True),
    "sd1-lora-pretrain": dict(lora_rank=4, pretrain_loss_weight=1.0, image_base_dir="<root>", random_flip=True),
    "sdxl-lora": dict(model_family="sdxl", lora_rank=4),
    "sd3-lora": dict(model_family="sd3", lora_rank=4),
    "flux-lora": dict(model_family="flux", lora_rank=4),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(REFL_SEED_CASES))
def test_refl_same_seed_same_weights_whatever_the_global_rng(case, tiny_dirs, tmp_path):
    """The trainer seeds the global generators itself: the test sets them to *different* states before each run
    (it never seeds them to the same value, which hid the unseeded LoRA init)."""
    options = dict(REFL_SEED_CASES[case])
    family = options.get("model_family", "sd1")
    base = tiny_dirs["sd1"] if family == "sd1" else save_tiny(family, tmp_path / family)
    if "pretrain_loss_weight" in options:
        options.update(pretrain_data=str(tiny_dirs["root"] / "pairs.json"), image_base_dir=str(tiny_dirs["root"]))
    import random

    import numpy as np

    results = []
    for run, global_state in enumerate((1234, 98765)):
        reward = tiny_reward()  # seeds torch itself: built before the global generators are set apart
        torch.manual_seed(global_state)
        np.random.seed(global_state)
        random.seed(global_state)
        cfg = refl_config(tiny_dirs, tmp_path / f"run{run}", pretrained_model_name_or_path=str(base), **options)
        trainer = ReFLTrainer(cfg, reward=reward)
        history = trainer.train()["history"]
        results.append((_trained_weights(trainer), history, trainer.ema))
        _reset_accelerate()
    (a, history_a, ema_a), (b, history_b, ema_b) = results
    assert history_a == history_b
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{case}: {len(changed)} tensors differ, e.g. {changed[:3]}"
    if ema_a is not None:
        assert all(torch.equal(x, y) for x, y in zip(ema_a.shadow_params, ema_b.shadow_params))
    if options.get("lora_rank"):  # the exported file too, bit for bit
        from safetensors.torch import load_file

        file_a = load_file(tmp_path / "run0" / "pytorch_lora_weights.safetensors")
        file_b = load_file(tmp_path / "run1" / "pytorch_lora_weights.safetensors")
        assert file_a.keys() == file_b.keys() and all(torch.equal(file_a[k], file_b[k]) for k in file_a)


@pytest.fixture(scope="module")
def rm_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rm_task")
    write_task(root, train=12, valid=4, test=4)
    return root


def rm_data(task: Path, out: Path, **train) -> dict:
    data = tiny_config_dict(task, **{"epochs": 1, "batch_size": 8, "accumulation_steps": 1, "fix_rate": 0.5,
                                     "checkpointing_steps": 1, "valid_per_epoch": 1, "test_at_end": False,
                                     "seed": 3, **train})
    for key in ("checkpoint_base", "visual_base", "log_base"):
        data[key] = str(out / key)
    return data


@pytest.mark.integration
def test_rm_trainer_same_seed_same_weights_whatever_the_global_rng(rm_task, tmp_path):
    from safetensors.torch import load_file

    weights = []
    for run, global_state in enumerate((5, 555)):
        torch.manual_seed(global_state)
        result = train_reward_model(config_from_dict(rm_data(rm_task, tmp_path / f"run{run}", max_steps=2)))
        weights.append(load_file(result.run_dir / "states" / "checkpoint-2" / "trainable.safetensors"))
        _reset_accelerate()
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---------------------------------------------------------------------------------------------- 3. resume
def test_new_config_fields_are_refused_on_resume_by_default():
    """A field added later without a rule (e.g. an online-RL option) is refused when it changes on resume."""
    import dataclasses

    extended = dataclasses.make_dataclass("Extended", [("new_option", int, dataclasses.field(default=1))],
                                          bases=(ReFLConfig,))
    policies = resume_policies(extended)
    assert policies["new_option"] == REFUSE and policies["gradient_accumulation_steps"] == REFUSE
    assert policies["max_train_steps"] == "accept" and policies["resume_from_checkpoint"] == "ignore"
    rm = resume_policies(RMTrainConfig)
    assert rm["train.accumulation_steps"] == REFUSE and rm["BLIP.image_size"] == REFUSE
    assert rm["train.max_steps"] == "accept" and rm["train.resume_from_checkpoint"] == "ignore"


@pytest.fixture(scope="module")
def refl_checkpoint(tiny_dirs, tmp_path_factory) -> Path:
    """A LoRA run stopped after 2 updates, with checkpoints at 1 and 2."""
    out = tmp_path_factory.mktemp("resume") / "run"
    ReFLTrainer(refl_config(tiny_dirs, out, lora_rank=4, max_train_steps=2, checkpointing_steps=1),
                reward=tiny_reward()).train()
    _reset_accelerate()
    return out


REFUSED = {
    "gradient_accumulation_steps": 2, "train_batch_size": 1, "learning_rate": 1e-4, "seed": 1, "lora_rank": 8,
    "reward": "ImageReward-v1.0:1.0,Aesthetic:0.1", "pretrained_model_name_or_path": "<copy>", "resolution": 64,
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(REFUSED))
def test_refl_resume_with_a_setting_that_changes_the_run_is_refused(name, refl_checkpoint, tiny_dirs, tmp_path):
    value = REFUSED[name]
    if value == "<copy>":  # the same files elsewhere are another base model as far as the run can tell
        value = str(shutil.copytree(tiny_dirs["sd1"], tmp_path / "other_base"))
    options = dict(lora_rank=4, max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest")
    cfg = refl_config(tiny_dirs, refl_checkpoint, **{**options, name: value})
    with pytest.raises(ResumeSettingsError, match=rf"checkpoint-2: --{name} .* -> {re.escape(repr(value))}") as err:
        ReFLTrainer(cfg, reward=tiny_reward())  # before any model loads
    assert err.value.changed == [name]


@pytest.mark.integration
def test_refl_resume_with_other_prompts_is_refused_and_the_cli_names_the_setting(refl_checkpoint, tiny_dirs,
                                                                                  tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"text": p + "!"} for p in PROMPTS]))
    cfg = refl_config(tiny_dirs, refl_checkpoint, lora_rank=4, checkpointing_steps=1, max_train_steps=2,
                      train_data=str(other), resume_from_checkpoint="latest")
    with pytest.raises(ResumeSettingsError, match="the prompts differ"):
        ReFLTrainer(cfg, reward=tiny_reward())
    argv = ["--pretrained_model_name_or_path", str(tiny_dirs["sd1"]), "--train_data", str(tiny_dirs["prompts"]),
            "--output_dir", str(refl_checkpoint), "--resume_from_checkpoint", "latest", "--lora_rank", "4",
            "--reward", str(tiny_dirs["reward"]), "--gradient_accumulation_steps", "4", "--train_batch_size", "2",
            "--resolution", "32", "--num_inference_steps", "4", "--stop_step_min", "2", "--stop_step_max", "3",
            "--grad_scale", "1", "--learning_rate", "5e-3", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--validation_steps", "1000", "--seed", "0", "--report_to", "none"]
    assert refl_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gradient_accumulation_steps 1 -> 4" in err[0], err
    assert refl_main(argv + ["--dry_run"]) == 2  # the dry run checks the same
    assert "--gradient_accumulation_steps 1 -> 4" in capsys.readouterr().err


@pytest.mark.integration
def test_refl_resume_with_harmless_changes_warns_and_keeps_the_history(refl_checkpoint, tiny_dirs, tmp_path,
                                                                       caplog):
    out = tmp_path / "run"
    shutil.copytree(refl_checkpoint, out)
    cfg = refl_config(tiny_dirs, out, lora_rank=4, max_train_steps=3, checkpointing_steps=5, validation_steps=7,
                      resume_from_checkpoint="latest")
    with caplog.at_level("WARNING"):
        result = ReFLTrainer(cfg, reward=tiny_reward()).train()
    assert result["global_step"] == 3 and len(result["history"]) == 1  # trained only the added update
    assert re.search(r"--max_train_steps changed: 2 -> 3", caplog.text)
    lines = [json.loads(line) for line in (out / "refl_args.history.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["start", "resume"]
    assert lines[0]["settings"]["max_train_steps"] == 2 and lines[1]["step"] == 2
    assert lines[1]["changed"] == {"output_dir": [str(refl_checkpoint), str(out)], "max_train_steps": [2, 3],
                                   "checkpointing_steps": [1, 5], "validation_steps": [1000, 7]}
    assert json.loads((out / "refl_args.json").read_text())["max_train_steps"] == 3  # the final run's settings


@pytest.fixture(scope="module")
def rm_stopped(rm_task, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("rm_resume")
    result = train_reward_model(config_from_dict(rm_data(rm_task, out, max_steps=1)))
    _reset_accelerate()
    return out, result.run_dir / "states" / "checkpoint-1"


@pytest.mark.integration
@pytest.mark.parametrize("key,value", [("accumulation_steps", 2), ("batch_size", 4), ("lr", 1e-4), ("seed", 4),
                                       ("fix_rate", 0.0), ("mixed_precision", "bf16")])
def test_rm_resume_with_a_key_that_changes_the_run_is_refused(key, value, rm_task, rm_stopped, capsys):
    out, state = rm_stopped
    data = rm_data(rm_task, out, max_steps=2, resume_from_checkpoint=str(state), **{key: value})
    with pytest.raises(ResumeSettingsError, match=rf"config key 'train.{key}' .* -> {re.escape(repr(value))}"):
        train_reward_model(config_from_dict(data))
    config = out / f"config-{key}.yaml"
    config.write_text(json.dumps(data))  # JSON is YAML
    assert imagereward_main(["train-rm", "--config", str(config), "--dry_run"]) == 2
    assert f"'train.{key}'" in capsys.readouterr().err


@pytest.mark.integration
def test_rm_resume_accepts_harmless_keys_and_refuses_other_data(rm_task, rm_stopped, tmp_path, caplog):
    out, state = rm_stopped
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run_dir = state.parent.parent
    state = copy / run_dir.relative_to(out) / "states" / "checkpoint-1"
    data = rm_data(rm_task, copy, max_steps=2, resume_from_checkpoint="latest", log_every=3, export_format="both")
    with caplog.at_level("WARNING"):
        result = train_reward_model(config_from_dict(data))
    assert result.global_step == 2
    assert re.search(r"config key 'train.max_steps' changed: 1 -> 2", caplog.text)
    history = [json.loads(line) for line in (result.run_dir / "train_config.history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    moved = {key: [str(out / key), str(copy / key)] for key in ("checkpoint_base", "visual_base", "log_base")}
    assert history[1]["changed"] == {**moved, "train.log_every": [10, 3], "train.export_format": ["folder", "both"],
                                     "train.max_steps": [1, 2]}
    _reset_accelerate()
    other = tmp_path / "other_data"  # the same images, fewer training prompts: accepted key, refused data
    other.mkdir()
    groups = json.loads((rm_task / "dataset" / "train.json").read_text())
    (other / "train.json").write_text(json.dumps(groups[:6]))
    shutil.copy(rm_task / "dataset" / "valid.json", other / "valid.json")
    changed_data = {**rm_data(rm_task, copy, max_steps=2, resume_from_checkpoint=str(state)), "data_base": str(other)}
    with pytest.raises(ResumeSettingsError, match="data under .* differ"):
        train_reward_model(config_from_dict(changed_data))


# ---------------------------------------------------------------------------------------------- 4. disk full
class SmallDisk:
    """A 16 MB tmpfs: a real file system that really runs out of space (``fill`` leaves ``leave`` bytes)."""

    def __init__(self, path: Path) -> None:
        self.path, self.filler = path, path / "filler.bin"

    def fill(self, leave: int = 0) -> None:
        stat = os.statvfs(self.path)  # not shutil.disk_usage: free_space_looks_fine patches it
        with open(self.filler, "ab") as handle:
            handle.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield SmallDisk(mount)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def free_space_looks_fine(monkeypatch):
    """The trainers' free-space check passes (another process fills the disk after it): the writes themselves
    must then fail cleanly."""
    from ImageReward import disk

    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: real(path)._replace(free=100 << 30))


@pytest.mark.integration
def test_refl_checks_free_space_before_writing_a_checkpoint(tiny_dirs, small_disk):
    trainer = ReFLTrainer(refl_config(tiny_dirs, small_disk.path / "run"), reward=tiny_reward())  # full fine-tune
    trainer.setup()
    with pytest.raises(DiskSpaceError, match=r"not enough disk space to write checkpoint checkpoint-0 .*resume"):
        trainer.save_checkpoint()
    assert not any(p.name.startswith("checkpoint") for p in (small_disk.path / "run").iterdir())


@pytest.mark.integration
@pytest.mark.parametrize("leave", [0, 6000], ids=["no-room", "room-for-a-few-files"])
def test_refl_checkpoint_on_a_full_disk_keeps_the_last_one_and_resumes(leave, tiny_dirs, small_disk,
                                                                       free_space_looks_fine):
    out = small_disk.path / "run"
    cfg = refl_config(tiny_dirs, out, lora_rank=4, max_train_steps=2, checkpointing_steps=1)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    real_save = trainer.save_checkpoint

    def disk_fills_before_the_second():
        if trainer.global_step == 2:
            small_disk.fill(leave)
        return real_save()

    trainer.save_checkpoint = disk_fills_before_the_second
    with pytest.raises(DiskSpaceError, match=r"disk full while writing checkpoint checkpoint-2 under .*"
                                             r"--resume_from_checkpoint latest") as err:
        trainer.train()
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / "refl_state.json").is_file()
    small_disk.release()
    _reset_accelerate()
    resumed = ReFLTrainer(refl_config(tiny_dirs, out, lora_rank=4, max_train_steps=2, checkpointing_steps=1,
                                      resume_from_checkpoint="latest"), reward=tiny_reward())
    assert resumed.train()["global_step"] == 2 and (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.integration
def test_refl_validation_images_and_final_export_on_a_full_disk(tiny_dirs, small_disk, free_space_looks_fine,
                                                                caplog):
    out = small_disk.path / "run"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"an earlier export")
    cfg = refl_config(tiny_dirs, out, lora_rank=4, validation_prompts=["a red cube"], validation_steps=1)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    real_validate = trainer.validate

    def disk_fills_then_validate():
        small_disk.fill(0)
        return real_validate()

    trainer.validate = disk_fills_then_validate
    with caplog.at_level("ERROR"), pytest.raises(DiskSpaceError, match="disk full while writing the final weights"):
        trainer.train()
    # validation only reports: one clear line, and training went on to the final save
    assert re.search(r"validation at step 1: disk full while writing validation images", caplog.text)
    assert trainer.validations[-1]["error"].startswith("DiskSpaceError")  # the rewards were still logged
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"an earlier export"  # not half-replaced
    assert not (out / "final.tmp").exists()


@pytest.mark.integration
def test_rm_trainer_states_best_and_export_on_a_full_disk(rm_task, small_disk, free_space_looks_fine, monkeypatch):
    from ImageReward.rm_training.export import export_model
    from ImageReward.rm_training.trainer import _initial_model, _Run

    options = dict(max_steps=2, validate_at_start=False, valid_per_epoch=4)  # validation (best/) at step 2
    cfg = config_from_dict(rm_data(rm_task, small_disk.path, **options))
    real_save_state, real_save_best = _Run.save_state, _Run._save_best

    def second_state_on_a_full_disk(run):
        if run.progress["global_step"] == 2:
            small_disk.fill(0)
        return real_save_state(run)

    monkeypatch.setattr(_Run, "save_state", second_state_on_a_full_disk)
    with pytest.raises(DiskSpaceError, match=r"disk full while writing training state checkpoint-2 .*resume"):
        train_reward_model(cfg)
    run_dir = Path(cfg.checkpoint_base) / cfg.run_name()
    assert sorted(p.name for p in (run_dir / "states").iterdir()) == ["checkpoint-1"]
    best = (run_dir / "best" / "trainable.safetensors").read_bytes()
    small_disk.release()
    _reset_accelerate()

    def best_on_a_full_disk(run, record):
        small_disk.fill(0)
        return real_save_best(run, record)

    monkeypatch.setattr(_Run, "save_state", real_save_state)
    monkeypatch.setattr(_Run, "_save_best", best_on_a_full_disk)
    resume = config_from_dict(rm_data(rm_task, small_disk.path, resume_from_checkpoint="latest", **options))
    with pytest.raises(DiskSpaceError, match="disk full while writing best/"):
        train_reward_model(resume)
    assert (run_dir / "best" / "trainable.safetensors").read_bytes() == best and not (run_dir / "best.tmp").exists()
    small_disk.release()
    monkeypatch.setattr(_Run, "_save_best", real_save_best)
    _reset_accelerate()
    assert train_reward_model(resume).global_step == 2  # resumes once there is room
    _reset_accelerate()
    # the export: the previous export stays whole
    _, model = _initial_model(cfg, None)
    export = small_disk.path / "export"
    export_model(model, export, mean=0.0, std=1.0)
    before = (export / "ImageReward" / "model.safetensors").read_bytes()
    small_disk.fill(0)
    with pytest.raises(DiskSpaceError, match="disk full while writing the export ImageReward"):
        export_model(model, export, mean=1.0, std=2.0)
    assert (export / "ImageReward" / "model.safetensors").read_bytes() == before
    assert not (export / "ImageReward.tmp").exists()


# ---------------------------------------------------------------------------------------------- 5. missing models
def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed once the with block ends: connections are refused


@pytest.mark.integration
@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable HF_ENDPOINT"])
def test_refl_without_the_hub_fails_at_once_naming_every_missing_file(network, tiny_dirs, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), IMAGEREWARD_CACHE=str(tmp_path / "ir"), PYTHONPATH=str(REPO))
    if network == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "refl.py"), "--train_data", str(tiny_dirs["prompts"]),
                           "--output_dir", str(tmp_path / "out")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert time.monotonic() - start < 100  # a hang guard, not a speed check
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert "--pretrained_model_name_or_path 'CompVis/stable-diffusion-v1-4'" in line
    assert ("HF_HUB_OFFLINE is set" if network == "HF_HUB_OFFLINE" else "cannot reach 127.0.0.1") in line
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert name in line
    assert "local diffusers StableDiffusionPipeline folder" in line
    assert "--reward 'ImageReward-v1.0'" in line and "ImageReward.pt" in line  # the reward's file too
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_refl_mistyped_or_incomplete_local_models_are_named_before_loading(tiny_dirs, tmp_path, monkeypatch):
    from ImageReward.finetune import families

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the files were checked")

    monkeypatch.setattr(families.ModelFamily, "load_components", no_loading)
    broken = shutil.copytree(tiny_dirs["sd1"], tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    bare = shutil.copytree(tiny_dirs["sd1"], tmp_path / "bare")  # no model_index.json: the files are the check
    (bare / "model_index.json").unlink()
    cases = [
        (dict(pretrained_model_name_or_path="./sd-tiny-typo"), r"--pretrained_model_name_or_path './sd-tiny-typo': "
                                                                r"no such folder"),
        (dict(pretrained_model_name_or_path=str(broken)), r"the folder lacks unet/diffusion_pytorch_model.safetensors"
                                                          r" \("),
        (dict(model_family="sdxl"), r"--model_family sdxl expects a StableDiffusionXLPipeline, .* is a "
                                    r"StableDiffusionPipeline \(pass --model_family sd1\)"),
        (dict(model_family="sdxl", pretrained_model_name_or_path=str(bare), lora_rank=4),
         r"lacks tokenizer_2/tokenizer_config.json, text_encoder_2/config.json, text_encoder_2/model.safetensors"),
        (dict(pretrained_vae_model_name_or_path=str(tmp_path / "novae")), r"--pretrained_vae_model_name_or_path "
                                                                           r".*novae': no such folder"),
        (dict(reward="ImageReward-v1.0", reward_download_root=str(tmp_path / "empty")),
         r"--reward 'ImageReward-v1.0': cannot download \(HF_HUB_OFFLINE is set\).*ImageReward.pt"),
        (dict(monitor_reward="Aesthetic", reward_download_root=str(tmp_path / "empty")),
         r"--monitor_reward 'Aesthetic': cannot download.*sac\+logos\+ava1-l14-linearMSE.pth.*ViT-L-14.pt"),
        (dict(reward="NoSuchScorer"), r"--reward 'NoSuchScorer': unknown scorer"),
    ]
    for options, message in cases:
        with pytest.raises(ReFLConfigError, match=message):
            ReFLTrainer(refl_config(tiny_dirs, tmp_path / "out", **options)).setup()  # checked first


def test_rm_trainer_missing_checkpoints_fail_in_one_line_before_loading(rm_task, tmp_path, capsys, monkeypatch):
    from ImageReward.rm_training import trainer as rm_trainer

    monkeypatch.setattr(rm_trainer, "_Run", None)  # nothing may be built before the check
    monkeypatch.setenv("IMAGEREWARD_CACHE", str(tmp_path / "empty"))
    cases = [
        ({"blip_path": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"},
         r"config key 'blip_path' .*cannot download \(HF_HUB_OFFLINE is set\); put model_large.pth into"),
        ({"blip_path": "models/model_lrge.pth"}, r"config key 'blip_path' 'models/model_lrge.pth': no such file"),
        ({"train": {"preload_path": "ImageReward-v1.0"}},
         r"config key 'train.preload_path' 'ImageReward-v1.0': cannot download.*ImageReward.pt"),
        ({"train": {"preload_path": "./runs/ImageRewrd"}}, r"config key 'train.preload_path' './runs/ImageRewrd'"),
    ]
    for change, message in cases:
        data = rm_data(rm_task, tmp_path)
        for key, value in change.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        config = tmp_path / "config.yaml"
        config.write_text(json.dumps(data))
        assert imagereward_main(["train-rm", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
    # no HF_HUB_OFFLINE, but the Hub does not answer (a closed port on this machine)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    port = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert imagereward_main(["train-rm", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"'train.preload_path' './runs/ImageRewrd'" in err  # the last config: a mistyped folder
    data["train"]["preload_path"] = "ImageReward-v1.0"
    config.write_text(json.dumps(data))
    assert imagereward_main(["train-rm", "--config", str(config)]) == 2
    assert re.search(rf"cannot download \(cannot reach 127.0.0.1:{port} .*ImageReward.pt", capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- 15. help, dry run
@pytest.fixture
def fake_launcher(tmp_path) -> tuple[dict, Path]:
    """PATH with an ``accelerate`` that only records that it was started."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "accelerate-started"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n")
    (bin_dir / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    return env, marker


def _bash(script: str, *args: str, env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
@pytest.mark.parametrize("script,program", [("scripts/train_refl.sh", "refl.py"),
                                            ("scripts/train_refl_sdxl.sh", "refl.py"),
                                            ("train/scripts/train_one_node.sh", "train.py")])
def test_script_help_only_prints(script, program, fake_launcher):
    env, marker = fake_launcher
    data = REPO / "data" / "refl_data.json"
    had_data = data.exists()
    cwd = REPO / "train" if script.startswith("train/") else REPO
    proc = _bash(str(REPO / script), "--help", "--max_train_steps", "1", env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"usage: {program}") == 1  # once, by one process
    assert "--dry_run" in proc.stdout and "set -euo" not in proc.stdout
    assert not marker.exists() and data.exists() == had_data  # no launch, no download


@pytest.mark.integration
def test_refl_scripts_dry_run_checks_without_training(tiny_dirs, tmp_path, fake_launcher):
    env, marker = fake_launcher
    out = tmp_path / "out"
    common = ["--pretrained_model_name_or_path", str(tiny_dirs["sd1"]), "--train_data", str(tiny_dirs["prompts"]),
              "--reward", str(tiny_dirs["reward"]), "--output_dir", str(out), "--dry_run"]
    proc = _bash(str(REPO / "scripts/train_refl.sh"), *common, env=env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "dry run" in text and "base model: " + str(tiny_dirs["sd1"]) + " (local folder" in text
    assert "prompts: 8 from" in text and "full unet + EMA, 100 updates of 64 prompts (2 x 4 accumulation x 8" in text
    assert not marker.exists() and not out.exists()
    sdxl = save_tiny("sdxl", tmp_path / "sdxl")
    proc = _bash(str(REPO / "scripts/train_refl_sdxl.sh"), *common, "--pretrained_model_name_or_path", str(sdxl),
                 env={**env, "LORA_RANK": "4", "NUM_GPUS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "family: sdxl" in proc.stdout and "LoRA rank 4" in proc.stdout and "x 1 process)" in proc.stdout
    proc = _bash(str(REPO / "scripts/train_refl.sh"), *common, "--train_data", str(tmp_path / "missing.json"), env=env)
    assert proc.returncode == 2 and "--train_data" in proc.stderr and "file not found" in proc.stderr
    assert not marker.exists()


@pytest.mark.integration
def test_train_one_node_dry_run_checks_without_training(rm_task, tmp_path, fake_launcher):
    env, marker = fake_launcher
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(rm_data(rm_task, tmp_path)))
    proc = _bash(str(REPO / "train/scripts/train_one_node.sh"), "--config", str(config), "--dry_run",
                 env={**env, "NUM_GPUS": "2"}, cwd=REPO / "train")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "dry run" in text and "blip_path: none (random initialisation)" in text
    assert re.search(r"train: 12 prompts, \d+ pairs", text) and "x 2 processes" in text
    assert "lr 1e-05 cosine" in text  # the script's --lr 1e-05 (YAML 1.1 reads 1e-05 as a string)
    assert not marker.exists() and not (tmp_path / "checkpoint_base").exists()
