"""Reward-model training at real size: disk per run, seconds per step and peak memory, as Markdown tables.

An ImageReward-size BLIP (ViT-L/16 + 12-layer BERT, random weights: no download) trains on a small synthetic
preference set in the documented ``{id, prompt, generations, ranking}`` format (``tests/rm_training_synthetic``)
with ``fix_rate`` 0.7 and a state saved every step: ``--steps`` steps, a resume for ``--resume-steps`` more, then
``imagereward train-rm --export-from best/``. Each phase runs in its own subprocess (its own peak RSS) while this
process samples the run folder's size (peak disk). Needs ~6-10 GB of RAM on CPU.

    python benchmarks/bench_rm_training.py                       # CPU, 2 + 1 steps
    python benchmarks/bench_rm_training.py --device cuda --steps 5 --resume-steps 2 --batch-size 4
    python benchmarks/bench_rm_training.py --size tiny           # the tests' model: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config(root: Path, args: argparse.Namespace, **train) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from rm_training_synthetic import tiny_config_dict

    data = tiny_config_dict(root, **{"batch_size": args.batch_size, "accumulation_steps": 1, "epochs": 1,
                                     "fix_rate": 0.7, "lr": 1e-5, "valid_per_epoch": 1, "checkpointing_steps": 1,
                                     "checkpoints_total_limit": 2, "seed": 1, "log_every": 1,
                                     "mixed_precision": args.precision, **train})
    if args.size == "real":
        data["BLIP"] = {"vit": "large", "image_size": 224, "patch_size": 16}
        data["ImageReward"] = {"mlp_dim": 768}
        data["med_config"] = str(ROOT / "train" / "src" / "config" / "med_config.json")
    return data


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:  # renamed or deleted while walking
                pass
    return total


def run_phase(phase: str, root: Path, args: argparse.Namespace) -> dict:
    """In the subprocess: one phase, timed; returns its figures."""
    import torch

    from ImageReward.rm_training import trainer
    from ImageReward.rm_training.config import config_from_dict

    torch.set_num_threads(args.threads)
    spent = {"validation": 0.0, "save_state": 0.0, "load_state": 0.0, "fit": 0.0, "saves": 0}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
                spent["saves"] += name == "save_state"
        return wrapper

    for name, attr in (("validation", "_after_validation"), ("save_state", "save_state"),
                       ("load_state", "load_state"), ("fit", "fit")):
        setattr(trainer._Run, attr, timed(name, getattr(trainer._Run, attr)))
    out: dict = {"phase": phase}
    start = time.perf_counter()
    if phase == "export":
        cfg = config_from_dict(_config(root, args))
        run_dir = Path(cfg.checkpoint_base) / cfg.run_name()
        result = trainer.export_from_state(cfg, run_dir / "best", device=args.device)
        out["export"] = str(result.export_dir)
    else:
        total = args.steps + (args.resume_steps if phase == "resume" else 0)
        extra = {"resume_from_checkpoint": "latest"} if phase == "resume" else {}
        cfg = config_from_dict(_config(root, args, max_steps=total, **extra))
        result = trainer.train_reward_model(cfg)
        steps = args.steps if phase == "train" else args.resume_steps
        loop = spent["fit"] - spent["validation"] - spent["save_state"] - spent["load_state"]
        out.update(steps=steps, s_per_step=loop / steps, s_per_save=spent["save_state"] / max(spent["saves"], 1),
                   s_load=spent["load_state"], s_validation=spent["validation"], global_step=result.global_step)
    out["wall_s"] = time.perf_counter() - start
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps before the stop (default 2)")
    parser.add_argument("--resume-steps", type=int, default=1, help="steps after resuming (default 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (default 2)")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--root", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        root = args.root
        print("RESULT " + json.dumps(run_phase(args.phase, root, args)), flush=True)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from rm_training_synthetic import write_task

    from ImageReward.rm_training.config import config_from_dict
    from ImageReward.rm_training.states import format_bytes

    root = args.root or Path(tempfile.mkdtemp(prefix="bench_rm_"))
    write_task(root, train=max(2, (args.steps + args.resume_steps) * args.batch_size // 5 + 1), valid=1, test=1)
    cfg = config_from_dict(_config(root, args))
    run_dir = Path(cfg.checkpoint_base) / cfg.run_name()
    peak = {"bytes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], _du(run_dir))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for phase in ("train", "resume", "export"):
        command = [sys.executable, __file__, "--phase", phase, "--root", str(root), "--size", args.size,
                   "--steps", str(args.steps), "--resume-steps", str(args.resume_steps), "--batch-size",
                   str(args.batch_size), "--precision", args.precision, "--device", args.device,
                   "--threads", str(args.threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"phase {phase} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0]))
    stop.set()
    sampler.join()

    import torch

    from ImageReward.rm_training.trainer import _initial_model

    _, model = _initial_model(cfg, None)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = max((run_dir / "states").iterdir())
    optimizer = (state / "optimizer.bin").stat().st_size
    sizes = {
        "one state (trainable weights + optimizer + RNG + progress)": _du(state),
        "  of which trainable.safetensors": (state / "trainable.safetensors").stat().st_size,
        "  of which optimizer.bin (Adam moments)": optimizer,
        "best/ (trainable weights)": _du(run_dir / "best"),
        "export ImageReward/ (config.json + model.safetensors)": _du(run_dir / "ImageReward"),
        f"run folder at the end ({len(list((run_dir / 'states').iterdir()))} states kept)": _du(run_dir),
        "run folder at its peak (sampled every 0.1 s)": peak["bytes"],
        "a state as saved before (full model + optimizer; computed)": params * 4 + optimizer,
    }
    print(f"\n{args.size} model: {params / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trainable (fix_rate 0.7); "
          f"batch {args.batch_size} pairs, {args.precision} precision, {args.device}, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| disk | size |\n|---|---:|")
    for name, size in sizes.items():
        print(f"| {name} | {format_bytes(size)} |")
    print("\n| phase | steps | s/step | s/state save | peak RSS |\n|---|---:|---:|---:|---:|")
    for r in results:
        if r["phase"] == "export":
            print(f"| export from best/ (test + mean/std + write) | - | - | - | {r['peak_rss_gb']:.2f} GB |"
                  f"  ({r['wall_s']:.1f} s)")
        else:
            print(f"| {r['phase']} | {r['steps']} | {r['s_per_step']:.2f} | {r['s_per_save']:.2f} | "
                  f"{r['peak_rss_gb']:.2f} GB |")


if __name__ == "__main__":
    main()
